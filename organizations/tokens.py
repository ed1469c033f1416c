"""Invitation tokens: signed with django.core.signing, never stored.

The token names the invitation and the address it was sent to, and carries
its signing time, so expiry is enforced twice: by the signature's age and by
the invitation's expires_at.
"""

from datetime import timedelta

from django.core import signing

from organizations.errors import InvalidToken
from organizations.models import Invitation

SALT = "organizations.invitation"


def make_invitation_token(invitation: Invitation) -> str:
    """Return the token for the invitation's accept link."""
    return signing.dumps(
        {"invitation": invitation.pk, "email": invitation.email}, salt=SALT
    )


def read_invitation_token(token: str, *, max_age: timedelta) -> tuple[int, str]:
    """Return the invitation id and email a valid token names."""
    try:
        data = signing.loads(token, salt=SALT, max_age=max_age)
    except signing.SignatureExpired:
        raise InvalidToken("This invitation link has expired.", field="token") from None
    except signing.BadSignature:
        raise InvalidToken(
            "This invitation link is not valid.", field="token"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("invitation"), int):
        raise InvalidToken("This invitation link is not valid.", field="token")
    return data["invitation"], str(data.get("email", ""))
