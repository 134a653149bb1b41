"""From noise to images: the samplers (ours and openai's), seeds to images (generation), zero-shot editing, and
the schedule search's ternary search.

May import: training.networks, training.compile, torch_utils, dnnlib.
"""
