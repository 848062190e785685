"""An NFNet image encoder on its own (`model.name = "vision_encoder"`), e.g. Flamingo's frozen NFNet-F6.

Variants: F0 ... F7 (Brock et al. 2021) at their train resolutions, with the
1000-class ImageNet head (`head=0` drops it, as Flamingo does), and `tiny`
for tests. A vision encoder has no training objective of its own yet: the
config serves `vlm-jax forward` and the systems that embed an NFNet. Every
NFNet setting is a `model.kwargs` key, at the module's default unless set here.
"""

from vlm_jax.config_lib import ConfigDict, ConfigError, module_defaults, parse_arg
from vlm_jax.encoders.nfnet import NFNet

RESOLUTION = {"F0": 192, "F1": 224, "F2": 256, "F3": 320, "F4": 384, "F5": 416, "F6": 448, "F7": 480}


def get_config(arg=None):
    arg = parse_arg(arg, variant="F6", head=1000)
    if arg.variant == "tiny":
        kwargs = dict(variant="F0", depths=(1, 1, 1, 1), widths=(16, 32, 32, 32), group_size=8, num_classes=arg.head)
        size = 32
    elif arg.variant in RESOLUTION:
        kwargs, size = dict(variant=arg.variant, num_classes=arg.head), RESOLUTION[arg.variant]
    else:
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, {', '.join(RESOLUTION)}.")
    kwargs = dict(module_defaults(NFNet), **kwargs)
    return ConfigDict(dict(model=dict(name="vision_encoder", encoder="nfnet", kwargs=kwargs, image_size=size), data={}))
