"""`python -m osrm_lora.cli ...`, as under `torchrun` or `accelerate launch`."""

from . import app

app()
