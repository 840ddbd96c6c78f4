"""The client side: the Flower-free edge client (`edge`, `images`), its Flower handlers and the ClientApp.

Layers inside: `app` (the project's ClientApp) -> `handlers` (MEKD's message handlers, for any ClientApp)
and `lr_probe` -> `edge` (distillation, emulator, queries; plain PyTorch) -> `images`. A Flower user
imports `register_mekd` (or `mekd_handlers`) and, for a custom client, `EdgeClient`.
"""

from mekd_fl.lazy import lazy_exports

_NAMES = {
    "register_mekd": "handlers",
    "register_handlers": "handlers",
    "mekd_handlers": "handlers",
    "EdgeClient": "edge",
    "EdgeSettings": "edge",
    "as_uint8_images": "images",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
