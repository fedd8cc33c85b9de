"""Chat operations with side effects: conversations, and posting, stopping and retrying messages.

A new message is answered at once when nothing waits (its answer's request goes to TabbyAPI while it is
saved: chat.generation), else held in the queue (chat.queue), which releases it in its turn.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from chat.balance import can_answer, conversation_model
from chat.early import EarlyRequest
from chat.generation import Answer, Claimed, answer_row, cancel_here, generate
from chat.models import Conversation, Message
from chat.prompts import asked, history
from chat.queue import admit, check_room, position, release_here, schedule_positions, wake
from chat.streaming import Prompt
from gantry.background import spawn
from gantry.broadcast import ConversationEvent, MessageEvent, QueuedEvent, broadcast, conversation_group, user_group
from gantry.parsers import is_storable
from models_admin.models import Backend
from models_admin.services import default_backend, known_model


def _send_message(message: Message) -> None:
    broadcast(conversation_group(message.conversation_id), MessageEvent(type="chat.message", message=message.as_event()))


# What people type: the same rules whichever way it came (the API, the page's socket)

UNSTORABLE = (
    "This text has a character that cannot be stored (a NUL character or half of a surrogate pair). "
    "Remove it and send again."
)
TITLE_LIMIT = Conversation._meta.get_field("title").max_length or 200


def _check_storable(text: str) -> None:
    if not is_storable(text):
        raise ValidationError(UNSTORABLE)


def _title(title: object, default: str | None) -> str:
    """A title as typed, trimmed; blank gives `default` (None: refused)."""
    if not isinstance(title, str):
        raise ValidationError("A conversation's title must be text.")
    _check_storable(title)
    title = title.strip()
    if not title:
        if default is None:
            raise ValidationError("A conversation needs a title.")
        return default
    if len(title) > TITLE_LIMIT:
        raise ValidationError(f"This title has {len(title):,} characters; the limit is {TITLE_LIMIT}. Shorten it and try again.")
    return title


# Conversations


def _model(model: object) -> str:
    """A model picked for a conversation: None or "" follows the default; a model no backend ever listed
    is refused (one listed but served by none now is kept: its messages wait, "Model not available")."""
    if model is None:
        return ""
    if not isinstance(model, str):
        raise ValidationError("A conversation's model is the name of a model, like \"Tiny-Chat-5M\", or null for the default model.")
    model = model.strip()
    if model and not known_model(model):
        raise ValidationError(f"There is no model named {model[:200]}. Pick one of the models the chat page lists.")
    return model


def create_conversation(user: Any, title: object = "", model: object = None) -> Conversation:
    conversation = Conversation.objects.create(owner=user, title=_title(title, default="New conversation"), model_name=_model(model))
    broadcast(user_group(user.pk), ConversationEvent(type="chat.conversation", conversation=conversation.as_event(), deleted=False))
    return conversation


def rename_conversation(conversation: Conversation, title: object) -> Conversation:
    conversation.title = _title(title, default=None)
    conversation.updated = timezone.now()
    # An UPDATE by id: a conversation deleted meanwhile (another tab) is a sentence, not an error.
    if not Conversation.objects.filter(pk=conversation.pk).update(title=conversation.title, updated=conversation.updated):
        raise ValidationError("This conversation was deleted.")
    event = ConversationEvent(type="chat.conversation", conversation=conversation.as_event(), deleted=False)
    broadcast(user_group(conversation.owner_id), event)
    return conversation


def pick_model(conversation: Conversation, model: object) -> Conversation:
    """The model answering a conversation from now on (None or "": the fleet's default, whichever it is)."""
    conversation.model_name = _model(model)
    conversation.updated = timezone.now()
    if not Conversation.objects.filter(pk=conversation.pk).update(model_name=conversation.model_name, updated=conversation.updated):
        raise ValidationError("This conversation was deleted.")
    event = ConversationEvent(type="chat.conversation", conversation=conversation.as_event(), deleted=False)
    broadcast(user_group(conversation.owner_id), event)
    wake()  # its held messages may now have a backend
    return conversation


def delete_conversation(conversation: Conversation) -> None:
    for message_id in conversation.messages.filter(status=Message.Status.GENERATING).values_list("id", flat=True):
        cancel_here(message_id)
    event = ConversationEvent(type="chat.conversation", conversation=conversation.as_event(), deleted=True)
    owner_id = conversation.owner_id
    conversation.delete()
    broadcast(user_group(owner_id), event)


# Messages


def post_message(
    conversation_id: int, content: object, request: dict[str, Any] | None = None, early: EarlyRequest | None = None
) -> Message:
    """Save the user's message in their conversation (its owner was checked by the caller) and start its
    answer. `request`: a request of the OpenAI-compatible API (chat.prompts.asked), answered instead of
    the conversation's history; its conversation is not shown in the sidebar. `early`: its answer's
    request, already sent to the backend it will most likely go to (kept if the claim agrees)."""
    content = _checked_content(content)
    # With no transaction of a caller's open, the answer's request goes to TabbyAPI while the message is
    # saved: the commit, not the caller, decides whether it stands.
    if early is None and not transaction.get_connection().in_atomic_block:
        early = EarlyRequest()
    try:
        with transaction.atomic():
            conversation, message, reply, backend = _save_question(conversation_id, content, early, request)
    except BaseException:
        if early is not None:
            early.withdraw()  # nothing was saved: the request is withdrawn
        raise
    sidebar = [
        (
            user_group(conversation.owner_id),
            ConversationEvent(type="chat.conversation", conversation=conversation.as_event(), deleted=False),
        )
    ]
    if conversation.source != Conversation.Source.CHAT:
        sidebar = []
    if reply is None or backend is None:
        _hold(message)
        for group, event in sidebar:
            broadcast(group, event)
        return message
    # The sidebar's update goes out with the answer's announcement, once TabbyAPI has the request.
    answer = Answer(message, reply, sidebar)
    if early is not None:
        early.saved(answer)
    else:
        prompt = _prompt(conversation_id, content, request, backend.active_model, before=message.created)
        claimed = Claimed(answer, backend, prompt)
        transaction.on_commit(lambda: spawn(generate(claimed, then=wake)))
    return message


def _checked_content(content: object) -> str:
    if not isinstance(content, str) or not content.strip():
        raise ValidationError("Type a message before sending.")
    limit = settings.GANTRY_MAX_MESSAGE_CHARS
    if len(content) > limit:
        raise ValidationError(f"This message has {len(content):,} characters; the limit is {limit:,}. Shorten it and send again.")
    _check_storable(content)
    return content


def _prompt(conversation_id: int, content: str, request: dict[str, Any] | None, model: str, before: Any = None) -> Prompt:
    return asked(request, model) if request is not None else history(conversation_id, content, before=before, model=model)


def _save_question(
    conversation_id: int, content: str, early: EarlyRequest | None, request: dict[str, Any] | None
) -> tuple[Conversation, Message, Message | None, Backend | None]:
    """In the post's transaction: the message, and its answer's row and backend when it is answered at
    once (the usual case: nothing waits, so it is claimed as it is saved, under the claim lock as any
    claim; otherwise the queue's order decides, after the commit). With `early`, the answer's request
    goes out first: only what it needs is read before it."""
    default = default_backend(locked=True)  # the claim lock
    backend = admit(conversation_id, conversation_model(conversation_id, default), default)
    answer_now = backend is not None
    if early is not None:
        early.to(backend, lambda chosen: _prompt(conversation_id, content, request, chosen.active_model), then=wake)
    conversation = Conversation.objects.filter(pk=conversation_id).first()
    if conversation is None:
        raise ValidationError("This conversation was deleted.")
    message = Message.objects.create(
        conversation=conversation,
        role=Message.Role.USER,
        content=content,
        status=Message.Status.GENERATING if answer_now else Message.Status.QUEUED,
        backend=backend,
        request=request,
    )
    if conversation.title == "New conversation":
        conversation.title = " ".join(content.split())[:60]
    conversation.save(update_fields=["title", "updated"])
    return conversation, message, answer_row(message, answered_before=False) if answer_now else None, backend


def _hold(message: Message) -> None:
    """A message that could not be answered at once: the queue releases it in its turn."""
    transaction.on_commit(partial(_start_or_hold, message))  # at once, unless a caller's transaction is open
    # A backend may have become ready meanwhile (its release then took this message).
    model = conversation_model(message.conversation_id)
    if not can_answer(model):
        # Held: tell the author where the message stands (the release updates it as the queue moves).
        event = QueuedEvent(type="chat.queued", message_id=message.pk, position=position(message, model))
        broadcast(conversation_group(message.conversation_id), event)
        # While it waits, the watchers check TabbyAPI every second (a model may be loaded on it directly).


def _start_or_hold(message: Message) -> None:
    """Start the answer now if it can start (its question then first shows as "generating"); else
    show the message as queued."""
    if message.pk not in release_here():
        _send_message(message)


def stop_message(message: Message) -> Message:
    """Stop a queued message or its answer being generated (Stop button, or Stop sent for the answer itself)."""
    # The generation belongs to the question (its status, its running task), whichever of the two was named.
    question = message.reply_to if message.role == Message.Role.ASSISTANT and message.reply_to is not None else message
    claimed = Message.objects.filter(pk=question.pk, status__in=[Message.Status.QUEUED, Message.Status.GENERATING]).update(
        status=Message.Status.CANCELLED
    )
    question.refresh_from_db()
    if claimed:
        cancel_here(question.pk)
        _send_message(question)
        schedule_positions()  # the messages queued behind it move up
    message.refresh_from_db()
    return message


def retry_message(message: Message) -> Message:
    """Send a failed or stopped message again."""
    if message.role != Message.Role.USER:
        raise ValidationError("Only your own messages can be sent again.")
    with transaction.atomic():
        # Under the backend's row lock, as a new message: a message sent again waits in the same queue,
        # within the same limits.
        default_backend(locked=True)
        retryable = Message.objects.filter(pk=message.pk, status__in=[Message.Status.FAILED, Message.Status.CANCELLED])
        if retryable.exists():
            check_room(message.conversation_id)
        # `updated` marks when it was queued (its hold time counts from there).
        updated = retryable.update(status=Message.Status.QUEUED, error="", updated=timezone.now())
    if not updated:
        message.refresh_from_db()
        if message.status == Message.Status.DONE:
            raise ValidationError("This message has already been answered.")
        raise ValidationError("This message is already being answered.")
    message.refresh_from_db()
    _send_message(message)
    wake()
    return message
