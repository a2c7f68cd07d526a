"""migm: learn the latent controlled dynamics of masked image generation models to speed them up."""

__version__ = "0.1.0"
