"""Settings shared by the precision tests' sampling runs on the tiny models: the prior without the parts
a text-to-image run never calls, 512² pictures, few steps, no progress bars."""

from cascade_helpers.sampling import OFFICIAL_DECODER, OFFICIAL_PRIOR

TEXT_ONLY = {"image_encoder": False, "effnet": False, "previewer": False}


def fast(prior_steps: int) -> dict:
    """``text_to_image`` options for a quick run: ``prior_steps`` Stage C steps, 2 Stage B steps."""
    return {
        "height": 512,
        "width": 512,
        "prior_settings": OFFICIAL_PRIOR.with_(steps=prior_steps),
        "decoder_settings": OFFICIAL_DECODER.with_(steps=2),
        "progress": False,
    }
