"""carbonsr: weakly supervised downscaling of 1 km carbon-emission rasters to 100 m.
Layers: commands/ -> downscale/, evaluate/, train/, stats -> aux/ and the GIS core -> models/."""

__version__ = "0.1.0"
