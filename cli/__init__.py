"""The geosat2map command-line interface (click); the work is done by the geosat2map library."""
