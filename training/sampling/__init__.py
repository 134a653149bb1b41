"""From noise to images: the samplers (ours: consistency and EDM's Heun in samplers, sCM's TrigFlow sampler in
samplers_trigflow, MeanFlow's in samplers_meanflow; openai's in samplers_karras), seeds to images (generation),
zero-shot editing, and the schedule search's ternary search.

May import: training.networks, training.compile, torch_utils, dnnlib.
"""
