from cellcloud.volumes.cli import app

app()
