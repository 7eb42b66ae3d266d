"""Speech data: examples, readers (manifests, folders, Hugging Face datasets), task templates,
the synthesiser and augmentation. Import the module you need (e.g. `voxtune.data.manifest`):
this package imports nothing itself, so reading a manifest does not load torch."""
