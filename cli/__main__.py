from .main import cli

cli(prog_name="geosat2map")
