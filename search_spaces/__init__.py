"""Search spaces: genotypes (plain data) and the spaces that sample, check and build them.

Only `SearchSpace.build` needs torch; everything else here is numpy and text.
"""

from .base import Dimension, SearchSpace, SpaceInfo, get_space, list_spaces, register_space
from .errors import ConfigError, DatasetError, GenotypeError, NasRunError, UnknownNameError
from .genotype import Genotype, Value

__all__ = [
    "ConfigError",
    "DatasetError",
    "Dimension",
    "Genotype",
    "GenotypeError",
    "NasRunError",
    "SearchSpace",
    "SpaceInfo",
    "UnknownNameError",
    "Value",
    "get_space",
    "list_spaces",
    "register_space",
]
