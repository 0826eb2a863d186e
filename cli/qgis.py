"""``geosat2map qgis-script``: translate as a QGIS Processing script."""

from __future__ import annotations

import sys

import click


@click.command("qgis-script")
@click.argument("folder", required=False, type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace a copy already there.")
def qgis_script_cmd(folder, overwrite) -> None:
    """Install translate as a QGIS Processing script into FOLDER (default: the scripts folder of
    QGIS 3's default profile). It runs geosat2map with this Python."""
    from geosat2map.qgis_script import install_script

    dst = install_script(folder, sys.executable, overwrite=overwrite)
    click.echo(f"wrote {dst}; in QGIS: Processing Toolbox > Scripts > geosat2map > Translate imagery into a map "
               "(restart QGIS, or reload the Toolbox, to see it)")
