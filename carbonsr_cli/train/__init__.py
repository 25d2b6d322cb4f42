"""Training: patch sampling, spatial split, the training loop, checkpoints and resume.

Modules: :mod:`.checkpoints` (atomic save, safe load), :mod:`.split` (spatial
train/validation split), :mod:`.dataset` (patch sampling and degradation),
:mod:`.loop` (``train(config) -> RunResult``), :mod:`.resume` (finding runs and
checkpoints to continue). Import the submodules directly; this package keeps
imports light so that ``carbonsr --help`` stays fast.
"""
