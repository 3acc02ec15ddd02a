"""Register difflm's model types with transformers' Auto classes on `import difflm`, lazily.

After `import difflm`, `AutoConfig` / `AutoModel` / `AutoModelForMaskedLM.from_pretrained(DIR)`
load a difflm folder (`model_type: qwen3_llada`) or a published LLaDA / Dream snapshot
(`llada`, `Dream`) with no trust_remote_code. Registering eagerly
would import transformers and torch (seconds) on every `import difflm`, `difflm --help` included, so
`install()` only adds an import hook: when transformers' own `configuration_auto` module finishes
loading, the config classes (`difflm.hf_configs`, which import nothing heavier than that module
already did) are registered with `AutoConfig`; when `modeling_auto` finishes loading, each model class
is registered as a `Deferred` stand-in that imports its real module on first use. If transformers'
Auto modules were loaded before difflm, `install()` registers at once. Only the public `register`
methods of the Auto classes are used.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `importlib.abc` alone would double the cost of `import difflm`
    from collections.abc import Callable
    from types import ModuleType

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"

# model_type -> (config class in difflm.hf_configs, module of the models, {Auto class: model class})
FAMILIES: dict[str, tuple[str, str, dict[str, str]]] = {
    "qwen3_llada": (
        "Qwen3LLaDAConfig",
        "difflm.models.qwen3_llada",
        {"AutoModel": "Qwen3LLaDAModel", "AutoModelForMaskedLM": "Qwen3LLaDAForMaskedLM"},
    ),
    # the published families: AutoModel gives the LM, as their own auto_map does
    "llada": (
        "LLaDAConfig",
        "difflm.models.llada",
        dict.fromkeys(("AutoModel", "AutoModelForMaskedLM"), "LLaDAModelLM"),
    ),
    "Dream": (
        "DreamConfig",
        "difflm.models.dream",
        dict.fromkeys(("AutoModel", "AutoModelForMaskedLM"), "DreamForMaskedLM"),
    ),
}


def _config_class(name: str) -> type:
    return getattr(importlib.import_module("difflm.hf_configs"), name)


def register_configs(configuration_auto: ModuleType) -> None:
    for model_type, (config_name, _, _) in FAMILIES.items():
        configuration_auto.AutoConfig.register(model_type, _config_class(config_name), exist_ok=True)


class Deferred:
    """Stands in an Auto mapping for a model class and imports the real one when first asked for
    (`from_pretrained`, `from_config`); `AutoModel*` then return the real class's instances."""

    config_class: type
    target: tuple[str, str]  # (module, class name)

    @classmethod
    def real(cls) -> Any:
        module, name = cls.target
        return getattr(importlib.import_module(module), name)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.real()._from_config(*args, **kwargs)


def register_models(modeling_auto: ModuleType) -> None:
    for config_name, module, heads in FAMILIES.values():
        config_class = _config_class(config_name)
        for auto_name, class_name in heads.items():
            stand_in = type(
                class_name, (Deferred,), {"config_class": config_class, "target": (module, class_name)}
            )
            getattr(modeling_auto, auto_name).register(config_class, stand_in, exist_ok=True)


class _RunAfter:
    """Wraps a module's loader: executes the module, then calls `after(module)`."""

    def __init__(self, loader: Any, after: Callable[[ModuleType], None]) -> None:
        self.loader, self.after = loader, after

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.after(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self.loader, name)


class _AutoHook:
    """A meta path finder that finds nothing itself: wraps the loader of the two Auto modules that another finder finds."""

    hooks: dict[str, Callable[[ModuleType], None]] = {
        CONFIG_AUTO: register_configs,
        MODELING_AUTO: register_models,
    }

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RunAfter(spec.loader, self.hooks[fullname])
                return spec
        return None


def install() -> None:
    """Register now where transformers' Auto modules are loaded; hook the rest (idempotent)."""
    for name, register in _AutoHook.hooks.items():
        if name in sys.modules:
            register(sys.modules[name])
    if not any(isinstance(finder, _AutoHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoHook())
