"""The shared ViT (a thin layer over timm's) and its presets by name."""
