"""SAM: the SA-1B layout (SPEC section 7): images listed in `partition/part*.txt`, captions in
`captions/<stem>.txt`, features in the standard folders of `diffusion.data.paths`."""
from diffusion.data import paths
from diffusion.data.datasets.internal import InternalData
from diffusion.data.errors import DataFileError
from diffusion.data.feature_io import read_image_size


class SAM(InternalData):
    """SA-1B at one resolution. The partition files carry neither sizes nor captions: the original size is
    read from the image header (so the images must be present even when features are), the caption from
    `captions/<stem>.txt` when features are not used. Items are as InternalData's."""

    annotation_kind = 'txt'
    annotation_list_key = 'image_list_txt'

    def __init__(self, root, image_list_txt=('part0.txt',), **kwargs):
        super().__init__(root, image_list_json=image_list_txt, **kwargs)

    def original_size(self, record):
        return read_image_size(paths.image_path(self.dataset_dir, record.path))

    def prompt(self, record):
        return read_caption(self.dataset_dir, record.path)


def read_caption(dataset, rel_path):
    """The caption of an SA-1B image, from `captions/<stem>.txt` of the dataset folder."""
    caption_file = paths.caption_text_path(dataset, rel_path)
    try:
        caption = caption_file.read_text(encoding='utf-8').strip()
    except FileNotFoundError:
        raise DataFileError(caption_file, 'caption file is missing') from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(caption_file, f'unreadable caption file ({err})') from err
    if not caption:
        raise DataFileError(caption_file, 'caption file is empty')
    return caption
