"""Training data: local files or hub datasets, as packed pre-training blocks (pretrain) or as chat and
preference rows in TRL's formats (chat). `local` finds and reads local files with `datasets`."""
