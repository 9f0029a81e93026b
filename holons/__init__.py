"""holons: foundation weights for radiographs learned as a part-whole anatomy hierarchy."""

__version__ = "0.1.0"
