"""Everything below the command lines, in rooms: networks (architectures and preconditioners), methods (each
training method with its loss), data (datasets), checkpoints (every file format in and out), sampling (samplers,
seeds to images, editing, schedule search) and loop (the training loop and its run files). Directly here: what the
command lines share (cli_common) and torch.compile of networks (compile).
"""
