"""Datasets, aspect-ratio buckets and feature paths."""
