"""The GeneMamba model (Flax NNX): Mamba-1/Mamba-2 mixers, BiMamba layers, the full model."""

from genemamba_jax.model.config import GeneMambaConfig
from genemamba_jax.model.convert import load_mixer_state_dict, mixer_state_dict
from genemamba_jax.model.genemamba import GeneMamba, GeneMambaOutput, cell_embedding, count_params
from genemamba_jax.model.mixers import Mamba1Mixer, Mamba2Mixer

__all__ = [
    "GeneMambaConfig", "GeneMamba", "GeneMambaOutput", "Mamba1Mixer", "Mamba2Mixer",
    "cell_embedding", "count_params", "load_mixer_state_dict", "mixer_state_dict",
]
