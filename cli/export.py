"""`companion export`: everything the companion keeps of a user, as /export sends it to them."""

from __future__ import annotations

from pathlib import Path

from cli.conversation import open_repository
from core.settings import Settings
from storage.export import export_json, transcript_markdown


async def export_user(settings: Settings, telegram_id: int, out: Path) -> int:
    """Write the JSON export and the Markdown transcript of a user into ``out``; nothing when they are unknown."""
    async with open_repository(settings) as repository:
        export = await repository.export_user(telegram_id)
    if export is None:
        print(f"nothing kept: user {telegram_id} is unknown")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    data, transcript = out / f"companion-export-{telegram_id}.json", out / f"companion-conversation-{telegram_id}.md"
    data.write_bytes(export_json(export))
    transcript.write_bytes(transcript_markdown(export))
    rows = {table: len(found) for table, found in export["tables"].items()}
    print(f"{data}: {', '.join(f'{count} {table}' for table, count in rows.items())}")
    print(transcript)
    return 0
