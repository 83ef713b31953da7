"""Tuning step 2: the trial slots one lane runs one after another."""


from kfp import dsl

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tuning_lane(study_uri: str, lane: int) -> list[int]:
    """Lists the slots of one lane: lane, lane + lanes, lane + 2 * lanes, ... below the number of trials.

    Lanes run side by side and each runs its slots one at a time, so parallel_trials (the number of lanes)
    is a run-time setting although a loop's parallelism is fixed when the pipeline is compiled.

    Args:
        study_uri: The study folder written by the setup step.
        lane: This lane's number, from 0.
    """
    from trainer import tuning

    return tuning.load_config(study_uri).lane_slots(lane)
