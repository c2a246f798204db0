"""Datasets (InternalData, InternalDataMS, SAM), their builder and batch samplers."""
from diffusion.data.datasets.bad_records import BadRecord, BadRecordLog, collate_skipping_bad_records
from diffusion.data.datasets.builder import DATASETS, build_dataset, build_dataset_from_config
from diffusion.data.datasets.internal import InternalData, InternalDataMS
from diffusion.data.datasets.sam import SAM
from diffusion.data.datasets.sampler import AspectRatioBatchSampler, DistributedBatchSampler, build_batch_sampler

__all__ = ['AspectRatioBatchSampler', 'BadRecord', 'BadRecordLog', 'DATASETS', 'DistributedBatchSampler',
           'InternalData', 'InternalDataMS', 'SAM', 'build_batch_sampler', 'build_dataset',
           'build_dataset_from_config', 'collate_skipping_bad_records']
