"""Train step of the DDPM CIFAR-10 U-Net: diffusion_jax vs diffusers' UNet2DModel (PyTorch), in one run.

    python benchmarks/train_step.py [--models cifar10,digits] [--rounds 3] [--steps 3] [--torch-threads 2]

Prints params, compile seconds, ms/step and img/s of each, and the ratio. See docs/benchmarks.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
