"""OpenAI chat `messages` -> a ChatRequest of the family's chat contract, and the images they carry.

A conversation is user / assistant turns ending with a user turn: the earlier pairs become the history,
the last user text the question. One image per conversation, in the first user turn (where every
family's prompt puts it); a second image is refused until multi-image exists. Content is a string or a
list of parts: {"type": "text", "text"} and {"type": "image_url", "image_url": {"url"}}, where the url is
a `data:` URL of a PNG, JPEG or WebP image, a local path (or file:// URL) inside the folder the operator
allows, or, when the operator enables it, an http(s) URL fetched with a size and time limit.
"""
import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional

from PIL import Image, UnidentifiedImageError

from ..inference import ChatRequest
from .errors import bad_request, too_large

FORMATS = ("PNG", "JPEG", "WEBP")
MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 << 20          # encoded image size (413 above)
    max_pixels: int = 4096 * 4096      # decoded width x height (413 above), checked before decoding
    local_dir: Optional[str] = None    # local paths are read only inside this folder (None: refused)
    remote: bool = False               # fetch http(s) URLs
    remote_timeout_s: float = 10.0


def decode_image(data, where, limits):
    """An RGB PIL image of encoded bytes that must be PNG, JPEG or WebP within the limits."""
    if len(data) > limits.max_bytes:
        raise too_large(f"{where}: the image is {len(data)} bytes, over the limit of {limits.max_bytes}", "messages")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as err:
        raise bad_request(f"{where}: not an image Pillow can read ({err.__class__.__name__})", "messages") from err
    with image:
        if image.format not in FORMATS:
            raise bad_request(f"{where}: a {image.format} image; PNG, JPEG and WebP are accepted", "messages")
        width, height = image.size
        if width * height > limits.max_pixels:
            raise too_large(f"{where}: the image is {width}x{height} = {width * height} pixels, over the limit of "
                            f"{limits.max_pixels}", "messages")
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise bad_request(f"{where}: the image is damaged or truncated ({err})", "messages") from err


def data_url_bytes(url, where):
    header, comma, payload = url.partition(",")
    mime = header[len("data:"):].split(";")[0].strip().lower()
    if not comma or ";base64" not in header.lower():
        raise bad_request(f"{where}: a data: URL must be data:<image type>;base64,<data>", "messages")
    if mime not in MIME_TYPES:
        raise bad_request(f"{where}: data URL of type {mime or 'none'!r}; accepted: image/png, image/jpeg, "
                          "image/webp", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{where}: the data URL is not valid base64", "messages") from err


def local_bytes(path, where, limits):
    if limits.local_dir is None:
        raise bad_request(f"{where}: local image paths are not allowed on this server (send a data: URL)",
                          "messages")
    root = os.path.realpath(limits.local_dir)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise bad_request(f"{where}: {path} is outside the folder this server reads images from", "messages")
    if not os.path.isfile(real):
        raise bad_request(f"{where}: no image file {path}", "messages")
    if os.path.getsize(real) > limits.max_bytes:
        raise too_large(f"{where}: {path} is {os.path.getsize(real)} bytes, over the limit of {limits.max_bytes}",
                        "messages")
    with open(real, "rb") as f:
        return f.read()


def remote_bytes(url, where, limits):
    if not limits.remote:
        raise bad_request(f"{where}: remote image URLs are not enabled on this server (send a data: URL)",
                          "messages")
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:  # noqa: S310 (http(s) only)
            data = response.read(limits.max_bytes + 1)
    except (OSError, ValueError) as err:
        raise bad_request(f"{where}: cannot fetch {url}: {err}", "messages") from err
    return data


def load_image_url(url, where, limits):
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: image_url.url must be a non-empty string", "messages")
    if url.startswith("data:"):
        data = data_url_bytes(url, where)
    elif url.startswith(("http://", "https://")):
        data = remote_bytes(url, where, limits)
    elif url.startswith("file://"):
        data = local_bytes(urllib.parse.unquote(urllib.parse.urlparse(url).path), where, limits)
    elif os.path.isabs(url):
        data = local_bytes(url, where, limits)
    else:
        raise bad_request(f"{where}: image_url.url must be a data: URL, an absolute path or an http(s) URL",
                          "messages")
    return decode_image(data, where, limits)


def split_content(content, where):
    """(text, [image urls]) of a message's content."""
    if isinstance(content, str):
        return content, []
    texts, urls = [], []
    for number, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text") or "")
        elif kind == "image_url":
            image_url = part.get("image_url")
            urls.append(image_url.get("url") if isinstance(image_url, dict) else image_url)
        else:
            raise bad_request(f"{where} part {number}: content parts of type {kind!r} are not supported "
                              "(text, image_url)", "messages")
    return "\n".join(texts), urls


def to_chat_request(messages, limits, english=False, template=None, origin=None):
    """The ChatRequest of a validated `messages` list (dicts with role and content); `english` and `template`
    are the request's prompt options (ChatRequest's)."""
    if not messages:
        raise bad_request("messages must hold at least one user message", "messages")
    image, turns = None, []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        role = message["role"]
        expected = "user" if number % 2 == 0 else "assistant"
        if role == "system":
            raise bad_request(f"{where}: system messages are not supported: each model family's prompt format "
                              "fixes its own", "messages")
        if role != expected:
            raise bad_request(f"{where}: expected a {expected} message (the conversation alternates user and "
                              f"assistant, starting and ending with user), got {role}", "messages")
        text, urls = split_content(message["content"] if message.get("content") is not None else "", where)
        if urls and role != "user":
            raise bad_request(f"{where}: images come in user messages", "messages")
        if urls and (image is not None or len(urls) > 1):
            raise bad_request(f"{where}: one image per conversation: this model takes a single image "
                              "(in the first user message)", "messages")
        if urls and number != 0:
            raise bad_request(f"{where}: the conversation's image must come with the first user message",
                              "messages")
        if urls:
            image = load_image_url(urls[0], where, limits)
        turns.append(text)
    if len(turns) % 2 == 0:
        raise bad_request("the last message must be a user message", "messages")
    history = list(zip(turns[0:-1:2], turns[1:-1:2]))
    return ChatRequest(prompt=turns[-1], image=image, history=history, english=english, template=template,
                       origin=origin)
