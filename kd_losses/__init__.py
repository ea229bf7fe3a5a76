"""Knowledge distillation losses, one module per method, and their registry.

Every module in this package (except `registry`) is imported here: its
`register(Method(...))` call adds it to `METHODS`, and the loss classes it
lists in `__all__` are exported, so `from kd_losses import AT` works as in
the original zoo. Adding a method is adding one file.
"""
import importlib
import pkgutil

from .registry import (METHODS, ConfigError, Context, Distiller, FeatureDistiller, Flag,
                       Method, PairSetting, PretrainPhase, all_flags, pick, register)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != 'registry' and not _info.name.startswith('_'):
        _module = importlib.import_module(f'{__name__}.{_info.name}')
        for _name in getattr(_module, '__all__', ()):
            globals()[_name] = getattr(_module, _name)
