"""A process-aware logger: rank 0 writes to the console and appends to a log file; other ranks stay quiet."""
import logging
import sys


def get_logger(name="pixart", log_file=None, is_main_process=True, level=logging.INFO):
    """Configure and return `logging.getLogger(name)`. The file is opened in append mode, so a resumed run
    adds to its log instead of truncating it (the reference truncates)."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if not is_main_process:
        logger.setLevel(logging.ERROR)
        logger.addHandler(logging.StreamHandler(sys.stderr))
        return logger
    logger.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger
