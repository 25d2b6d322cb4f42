"""Training: patch sampling, spatial split, the training loop (``loop``, ``step``, ``validation``,
``reporting``) and resume; import the submodules directly (``carbonsr --help`` stays fast)."""
