"""Train a Stage C LoRA, and new tokens, on a folder of pictures: the official objective, made practical.

The objective is the official one (``train/train_c_lora.py`` with its ``gdf``: noise prediction on the
cosine schedule, P2-weighted, 5% empty captions, 10% image embeddings), on accelerate's and diffusers'
parts. Added around it, as SimpleTuner's Stage C guide does: cached features, the official aspect
buckets, repeats, crops, checkpoints that resume exactly and hold only safetensors and JSON, a stop at
the first non-finite loss, one run per output folder, validation pictures, several GPUs::

    accelerate launch -m cascade_helpers.lora_training --config outputs/lora/run.json
"""
