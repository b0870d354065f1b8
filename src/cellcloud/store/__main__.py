from cellcloud.store.cli import app

app(prog_name="python -m cellcloud.store")
