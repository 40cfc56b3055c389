"""A Schemathesis check for tests/service/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

schemathesis.toml lets a schema-valid request get 422 (JSON API) or 400 (V2) where JSON Schema cannot say
what is valid. This check makes sure such a refusal is one of the documented ones (the image does not
decode or does not fit the model; the tensor's values, shape, name or datatype do not fit the model) and
never a refusal of the request's form, which the schema must exclude instead.
"""

from __future__ import annotations

import json
import re

import schemathesis

# JSON API: the error codes of an image that does not decode, or decodes to the wrong size
IMAGE_CODES = {"invalid_image", "wrong_shape"}
# V2: what a tensor can get wrong that its schema cannot see
V2_CONTENT = re.compile(
    r"^inputs(\[\w+\])*: ("
    r"data holds \d+ values; shape \[[\d, ]*\] needs \d+"  # values against the shape
    r"|data is not a \(nested\) list of the tensor's shape"
    r"|this model takes exactly one input, '\w+'; got .*"  # x (encode, score) or z (decode)
    r"|images have shape \[[\d, ]*\]; expected .*"
    r"|latents have shape \[[\d, ]*\]; this model's are .*"
    r"|pixel values must be integers, got \w+"
    r"|pixel values range over .*"
    r"|latents must be finite numbers within float32 range"
    r"|data values do not (match|fit) datatype \w+"
    r")$"
)


@schemathesis.check
def refusals_are_documented(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code not in (400, 422):
        return None
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"a refusal without the protocol's error shape: {response.content[:300]!r}") from None
    if case.operation.path.startswith("/v2/"):
        if not isinstance(error, str) or not V2_CONTENT.match(error):
            raise AssertionError(f"a schema-valid V2 request was refused for its form: {error!r}")
    elif error.get("code") not in IMAGE_CODES:
        raise AssertionError(f"a schema-valid request was refused for its form: {error!r}")
    return None
