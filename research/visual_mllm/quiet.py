"""Quiet frameworks, and nothing written to the working folder (standard library only).

`visual_mllm/__init__` calls `quiet_frameworks()` before it imports MindSpore and mindformers:

* files: mindformers' logs (default `./output/log/rank_0/{info,error}.log`) go to `<cache>/logs/mindformers`
  unless LOG_MF_PATH or LOCAL_DEFAULT_PATH is set; MindSpore's compile-failure dumps (default
  `./rank_0/om/analyze_fail.ir`) go to `<cache>/logs/mindspore` unless MS_OM_PATH is set (cache: `cache_dir()`).
* noise, unless $VISUAL_MLLM_VERBOSE is 1/true: MindSpore logs errors only (GLOG_v=3, when GLOG_v is not
  set), mindformers' records below ERROR are dropped (its import-time notices, "The input config ... is
  empty"), and the Python warnings the frameworks raise while they are imported (`quiet_imports()`) are
  ignored; other warnings are left as they are (importing this package changes no warning filter).

`verbose()` (the command lines' --verbose) lifts the mindformers and Python-warning filters from then on;
MindSpore reads GLOG_v once, at import, so its level needs $VISUAL_MLLM_VERBOSE=1 (or GLOG_v) set before.
"""
import contextlib
import logging
import os
import warnings

from .paths import cache_dir

VERBOSE_ENV = "VISUAL_MLLM_VERBOSE"
MINDSPORE_ERRORS_ONLY = "3"  # GLOG_v: 0 debug, 1 info, 2 warning (MindSpore's default), 3 error


class _ErrorsOnly(logging.Filter):
    def filter(self, record):
        return record.levelno >= logging.ERROR


ERRORS_ONLY = _ErrorsOnly()


def verbose_requested():
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def mindformers_logger():
    """mindformers' logger, which it names after its log folder (mindformers.tools.logger.get_logger)."""
    return logging.getLogger("mindformers" + os.path.expanduser(os.environ["LOG_MF_PATH"]))


def quiet_frameworks():
    logs = os.path.join(cache_dir(), "logs")
    if "LOG_MF_PATH" not in os.environ:  # mindformers' own choice when LOCAL_DEFAULT_PATH is set
        local = os.environ.get("LOCAL_DEFAULT_PATH")
        os.environ["LOG_MF_PATH"] = (os.path.join(os.path.realpath(os.path.expanduser(local)), "log") if local
                                     else os.path.join(logs, "mindformers"))
    os.environ.setdefault("MS_OM_PATH", os.path.join(logs, "mindspore"))
    if verbose_requested():
        return
    os.environ.setdefault("GLOG_v", MINDSPORE_ERRORS_ONLY)
    mindformers_logger().addFilter(ERRORS_ONLY)


@contextlib.contextmanager
def quiet_imports():
    """Around the frameworks' imports: their import-time warnings (deprecation notices) ignored, unless verbose."""
    with warnings.catch_warnings():
        if not verbose_requested():
            warnings.simplefilter("ignore")
        yield


def verbose():
    """Keep the frameworks' messages from now on, in this process and the processes it starts."""
    os.environ[VERBOSE_ENV] = "1"
    mindformers_logger().removeFilter(ERRORS_ONLY)
