"""Train a Stage C LoRA, and new tokens, on a folder of pictures: the official objective, made practical.

**The objective is the official one** (``train/train_c_lora.py`` with its ``gdf``), so a LoRA trained
here works on the real model: clean EfficientNet latents noised at t = (1 − U) + 0.001 on the cosine
schedule, the model conditioned on the cosine time of that logSNR and predicting the noise, the MSE
weighted by P2 = 1 / (1 + SNR); 5% empty captions, 10% CLIP image embeddings; Stage C in eval mode;
AdamW, clipping at 1.0, 1e-4 at a constant rate, rank 4 on attention; pictures in the official
aspect buckets (area (¾·resolution)², sides multiples of 32), centre-cropped.

**The loop is accelerate's and diffusers'** (``Accelerator.prepare``, ``accumulate``, ``backward``,
``clip_grad_norm_``; ``get_scheduler``; ``EMAModel``). **Added around it**, as SimpleTuner's Stage C
guide does: latents, image and text embeddings cached on disk (keyed by file contents and the
encoders), repeats per folder, random crops, picture size limits, gradient checkpointing, bf16 or
float32; checkpoints that resume exactly, are never half-written and hold only safetensors and JSON
(a damaged one is named and the one before it used; Ctrl-C saves one); a stop at the first
non-finite loss; one run per output folder (a lock); validation pictures; several GPUs::

    accelerate launch -m cascade_helpers.lora_training --config outputs/lora/run.json

One module each: ``config`` (the settings, checked), ``data`` (pictures, captions, buckets, batch
order), ``cache`` (feature caches), ``objective`` (the official loss), ``trainer`` (the loop),
``checkpointing`` (checkpoint folders), ``validation`` (validation pictures), ``cli`` (the command line).
"""
