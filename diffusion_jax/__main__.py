import sys

from diffusion_jax.cli.main import main

sys.exit(main())
