"""The errors the server answers with, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""


class APIError(Exception):
    """An answer other than 200: its HTTP status, a message for the client and OpenAI's error type/code."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_unavailable",
             500: "server_error"}

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message, param=None, code=None):
    return APIError(400, message, param, code)


def too_large(message, param=None):
    return APIError(413, message, param, "payload_too_large")
