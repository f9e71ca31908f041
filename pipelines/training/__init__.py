"""The train stage's library (``pipelines/train.py`` is its entry point): the YAML config
(`config`, read strictly by `config_io`), the Ray Train worker loop (`loop`) and the progress
line the driver prints (`progress`)."""

AUTOSELECT_DIR = "autoselect"  # a checkpoint's AutoSelect folder (scorer + denoiser), beside the optimiser state
