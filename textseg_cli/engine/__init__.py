"""Training engine: the loop (loop.py), its entry point `train()` (setup.py), DDP (distributed.py), optimiser
and schedule (optim.py), stopping rules (stopping.py) and the run log (runlog.py)."""
