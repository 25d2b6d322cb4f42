"""carbonsr: weakly supervised downscaling of 1 km carbon-emission rasters to 100 m."""

__version__ = "0.1.0"
