"""Running a speech LM for users: its replies, spoken back."""

from voxtune.infer.spoken_reply import REPLY_STYLE, SpokenReply, reply_voice, speak_reply

__all__ = ["REPLY_STYLE", "SpokenReply", "reply_voice", "speak_reply"]
