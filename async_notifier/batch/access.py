"""Which objects a message may have mailed: the buckets, and the keys of its owner.

Anyone who can publish to the queue can name a bucket and a key; the function's role may
read more than should ever be mailed, and the recipient is named in the same message. So
the bucket must be one of ALLOWED_BUCKETS ("*" allows any, said on purpose), and, with
ALLOWED_KEY_PREFIX, the key must start with the prefix filled in from the message itself
(`{cognito_user_id}`, `{video_id}`). A prefix tied to the Cognito user also requires the
recipient to be that user: a message naming an `email` of its own could otherwise have
one user's frames mailed anywhere.
"""

from __future__ import annotations

import string

from ..config import ANY_BUCKET, Settings
from ..errors import BucketNotAllowed, KeyNotAllowed
from ..messages import Notification

# S3 takes keys literally, but S3-compatible stores and proxies may not: a key that walks
# out of its prefix is refused rather than trusted to be read literally.
_DOT_SEGMENTS = frozenset({".", ".."})


def check_location(notification: Notification, settings: Settings) -> None:
    """Raise BucketNotAllowed or KeyNotAllowed unless the message may have its ZIP mailed."""
    bucket, key = notification.bucket, notification.key
    if bucket is None or key is None:
        return
    allowed = settings.allowed_buckets
    if ANY_BUCKET not in allowed and bucket not in allowed:
        raise BucketNotAllowed(f"bucket {bucket!r} is not in ALLOWED_BUCKETS")
    template = settings.allowed_key_prefix
    if template is None:
        return
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    values = {
        "cognito_user_id": notification.cognito_user_id,
        "video_id": notification.video_id,
    }
    missing = sorted(name for name in fields if not values.get(name))
    if missing:
        raise KeyNotAllowed(
            f"ALLOWED_KEY_PREFIX needs {', '.join(missing)}, which the message does not carry"
        )
    bent = sorted(name for name in fields if "/" in (values[name] or ""))
    if bent:
        raise KeyNotAllowed(f"{', '.join(bent)} must not contain '/' (ALLOWED_KEY_PREFIX)")
    if any(segment in _DOT_SEGMENTS for segment in key.split("/")):
        raise KeyNotAllowed("a key with '.' or '..' segments is refused (ALLOWED_KEY_PREFIX)")
    if "cognito_user_id" in fields and notification.email is not None:
        raise KeyNotAllowed(
            "ALLOWED_KEY_PREFIX ties keys to the Cognito user, so the recipient must be that "
            "user: the message names an email of its own"
        )
    prefix = template.format(**values)
    if not key.startswith(prefix):
        raise KeyNotAllowed(f"key {key[:200]!r} is outside ALLOWED_KEY_PREFIX ({prefix!r})")
