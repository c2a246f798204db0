"""The `skip_bad_records` mode: a dataset returns a `BadRecord` for a record it cannot load, the collate
function leaves it out of the batch and hands it on, and `BadRecordLog` counts and reports them per epoch."""
from typing import NamedTuple

from torch.utils.data import default_collate


class BadRecord(NamedTuple):
    """A record left out of its batch: its index, where it is listed, and why it could not be loaded."""
    index: int
    source: str
    reason: str


def collate_skipping_bad_records(items):
    """Collate dataset items like the default collation, leaving out `BadRecord`s.

    Returns `(x, caption_feature, attention_mask, data_info)` with `data_info['bad_records']` the list of
    BadRecords of this batch. When every item is bad, x, caption_feature and attention_mask are None and
    data_info holds only 'bad_records': the caller skips the step.
    """
    good = [item for item in items if not isinstance(item, BadRecord)]
    bad = [item for item in items if isinstance(item, BadRecord)]
    if not good:
        return None, None, None, {'bad_records': bad}
    x, caption_feature, attention_mask, data_info = default_collate(good)
    data_info['bad_records'] = bad
    return x, caption_feature, attention_mask, data_info


class BadRecordLog:
    """Records skipped during an epoch: `add()` each batch's `data_info['bad_records']`, `summary()` at the
    end of the epoch, then `reset()`."""

    def __init__(self, max_listed=20):
        self.max_listed = max_listed
        self.records = []

    def add(self, bad_records):
        self.records.extend(bad_records)

    def __len__(self):
        return len(self.records)

    def reset(self):
        self.records = []

    def summary(self, epoch=None):
        where = f'epoch {epoch}: ' if epoch is not None else ''
        if not self.records:
            return f'{where}no bad records skipped'
        lines = [f'{where}skipped {len(self.records)} bad record(s):']
        lines += [f'  record {r.index} ({r.source}): {r.reason}' for r in self.records[:self.max_listed]]
        if len(self.records) > self.max_listed:
            lines.append(f'  ... and {len(self.records) - self.max_listed} more')
        return '\n'.join(lines)
