"""What several commands parse alike."""
import ast


def parse_option(text: str):
    """'s_churn=40' -> ('s_churn', 40.0); values are Python literals, else strings."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise ValueError(f"--option {text!r} must look like NAME=VALUE (e.g. --option s_churn=40)")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def control_scales(scales, k: int):
    """--conditioning-scale values (none: 1) as a (k,) float32 array for k ControlNets; one value serves all."""
    import numpy as np

    scales = list(scales) or [1.0]
    if len(scales) not in (1, k):
        raise ValueError(f"--conditioning-scale: give one value or one per ControlNet ({k}), got {len(scales)}")
    return np.broadcast_to(np.asarray(scales, np.float32), (k,))


def control_note(control, guess_mode: bool) -> str:
    """', 2 ControlNet(s) at conditioning_scale 1, 0.5 in guess mode' for the summary line ('' without control)."""
    if control is None:
        return ""
    scales = ", ".join(f"{s:g}" for s in control["conditioning_scale"])
    return (f", {len(control['control'])} ControlNet(s) at conditioning_scale {scales}"
            f"{' in guess mode' if guess_mode else ''}")
