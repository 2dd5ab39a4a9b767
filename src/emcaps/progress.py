"""Progress bars: tqdm on stderr, drawn only where someone watches (a terminal).

In a log file or CI a redrawn bar is noise; there, training still prints its one line per epoch.
"""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(total: int | None, desc: str = "", enabled: bool = True, unit: str = "it",
                 initial: int = 0) -> tqdm:
    """A tqdm bar over `total` units (None: unknown), silent unless `enabled` and stderr is a terminal.

    Byte counts (unit "B") are shown scaled (kB, MB).
    """
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=None if enabled else True,
                unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000, dynamic_ncols=True)
