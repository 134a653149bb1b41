"""Network and training files in and out: our snapshots and training states (checkpoint), official EDM/EDM2/ECT
pickles read without running their code (safe_pickle), openai consistency_models state dicts (openai_state),
py-meanflow checkpoints (meanflow_state), safetensors exports and Hugging Face Hub paths (export, hub).

May import: training.networks, training.loop.run_records, training.sampling.samplers, torch_utils, dnnlib.
"""
