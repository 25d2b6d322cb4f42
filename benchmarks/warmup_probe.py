"""Where the model warm-up of a downscale run goes (issue 20, session 17): a fresh process per mode
(`default`: fp32 then bf16 at batch 64, as `_Predictor.warm_up`; `small`: batch 4 first;
`bf16only`: bf16 first), each step synchronised, seconds since the start. Run on a GPU machine:
`python benchmarks/warmup_probe.py CKPT MODE` (a `base` checkpoint from `bench_downscale._make_checkpoint`)."""
import sys, time, json
T0 = time.perf_counter()
def t(): return round(time.perf_counter() - T0, 3)
mode = sys.argv[2]
marks = {}
import torch
marks['import'] = t()
sys.path[:0] = ['.']
from pathlib import Path
from carbonsr_cli.checkpoints import load_checkpoint, load_model_for_inference
from models.inference import low_precision_copy
ck = load_checkpoint(Path(sys.argv[1]))
dev = torch.device('cuda')
loaded = load_model_for_inference(Path(sys.argv[1]), dev, checkpoint=ck)
torch.cuda.synchronize(); marks['loaded'] = t()
model = loaded.model
C = len(loaded.aux_names)
def fwd(m_, b):
    with torch.inference_mode():
        a = torch.rand((b, C, 1, 120, 120), device=dev)
        mm = torch.rand((b, 1, 1, 120, 120), device=dev)
        m_(a, mm); torch.cuda.synchronize()
if mode == 'default':  # what warm_up does: fp32 then bf16, batch 64; then the first real batch (both again)
    fwd(model, 64); marks['fp32 #1'] = t()
    low = low_precision_copy(model); torch.cuda.synchronize(); marks['bf16 copy'] = t()
    fwd(low, 64); marks['bf16 #1'] = t()
    fwd(model, 64); marks['fp32 #2'] = t()
    fwd(low, 64); marks['bf16 #2'] = t()
elif mode == 'small':  # fp32 and bf16 on a batch of 4 first, then the full batch
    fwd(model, 4); marks['fp32 b4'] = t()
    low = low_precision_copy(model); torch.cuda.synchronize(); marks['bf16 copy'] = t()
    fwd(low, 4); marks['bf16 b4'] = t()
    fwd(model, 64); marks['fp32 b64'] = t()
    fwd(low, 64); marks['bf16 b64'] = t()
elif mode == 'bf16only':
    low = low_precision_copy(model); torch.cuda.synchronize(); marks['bf16 copy'] = t()
    fwd(low, 64); marks['bf16 #1'] = t()
    fwd(model, 64); marks['fp32 #1'] = t()
print(json.dumps({'mode': mode, **marks}))
