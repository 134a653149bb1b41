"""The training loop and its run: the loop and its step (training_loop), its set-up (runtime), options and callbacks,
EMA trackers (ema, phema), run directories and files (run_dirs, run_files, run_records), experiment trackers and
plots.

May import every other room of training/ (the loop is their user), torch_utils, dnnlib.
"""
