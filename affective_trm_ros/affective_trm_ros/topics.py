"""The suite's topic names, in one place: every node uses these relative names, and users rename
them the ROS way, by remapping (``remappings=[('image_raw', '/camera/image')]`` in a launch file,
``-r image_raw:=/camera/image`` on the command line, ``--image-topic`` in ``affective-trm run``).

No rclpy here: offline tools (bags, replay) use the same names.
"""

from affective_trm_ros.core.modalities import AUDIO, TEXT, VIDEO

# ---- raw inputs
IMAGE = 'image_raw'                          # sensor_msgs/Image
COMPRESSED_SUFFIX = '/compressed'            # image_transport's compressed sub-topic
IMAGE_COMPRESSED = IMAGE + COMPRESSED_SUFFIX  # sensor_msgs/CompressedImage
AUDIO_STREAM = 'audio'                       # audio_common_msgs/AudioDataStamped or AudioData
AUDIO_INFO = 'audio_info'                    # audio_common_msgs/AudioInfo
SPEECH = 'speech'                            # std_msgs/String
GROUND_TRUTH = 'affect/ground_truth'         # affective_msgs/ValenceArousal in recordings, per stream_id

# ---- what the suite publishes
EMBEDDINGS = {modality: f'affect/embedding/{modality}' for modality in (VIDEO, AUDIO, TEXT)}
ESTIMATES = 'affect/valence_arousal'         # affective_msgs/ValenceArousal
VISUALIZATION = 'affect/visualization'       # sensor_msgs/Image
RESET_SERVICE = 'affect/reset'               # affective_msgs/srv/ResetState
TRACKED_STREAMS = 'affect/tracked_streams'   # affective_msgs/TrackedStreams (transient local)
DIAGNOSTICS = '/diagnostics'                 # diagnostic_msgs/DiagnosticArray (absolute, by convention)

# ---- ROS4HRI (REP-155)
HRI_TRACKED_FACES = '/humans/faces/tracked'  # hri_msgs/IdsList


def hri_expression_topic(face_id: str) -> str:
    """hri_msgs/Expression of one tracked face."""
    return f'/humans/faces/{face_id}/expression'
