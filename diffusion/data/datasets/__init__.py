"""Datasets (InternalData, InternalDataMS, SAM), their builder and batch samplers."""
from diffusion.data.datasets.builder import DATASETS, build_dataset, build_dataset_from_config, dataset_class
from diffusion.data.datasets.internal import InternalData, InternalDataMS
from diffusion.data.datasets.sam import SAM
from diffusion.data.datasets.batch_sampler import AspectRatioBatchSampler, DistributedBatchSampler, build_batch_sampler

__all__ = ['AspectRatioBatchSampler', 'DATASETS', 'DistributedBatchSampler', 'InternalData', 'InternalDataMS',
           'SAM', 'build_batch_sampler', 'build_dataset', 'build_dataset_from_config', 'dataset_class']
