"""Affective-TRM for ROS 2: continuous valence/arousal estimation with a stateful Tiny Recursive Model.

Rings (imports only go downwards):
  core      -- model, alignment, metrics, audio/image conversion, encoder plugins. No rclpy.
  training  -- feature store, training, evaluation, plots, bag reading/writing. No rclpy.
  nodes     -- thin rclpy glue around core.
"""

__version__ = '0.1.0'
