// Server-Sent Events read with fetch(), so that the stream can carry the Authorization header
// (EventSource cannot send one, and the token must never go into a URL).
//
//   const stream = eventStream(url, { headers, onEvent: (name, data) => ..., onRefused, reconnectMs });
//   stream.close();
//
// Like EventSource: events are dispatched at each blank line, `id:` is remembered and sent back
// as Last-Event-ID when the stream reconnects (reconnectMs; null: do not), comment lines are
// skipped. Unlike it, a refusal (any 4xx: a missing or wrong token, a deleted job, too many
// streams) ends the stream with onRefused(status) instead of retrying forever.

export function eventStream(
  url,
  { headers = {}, onEvent, onRefused = () => {}, onBroken = () => {}, reconnectMs = 2000 },
) {
  const controller = new AbortController();
  let lastId = null;
  let closed = false;
  let timer = 0;

  async function connect() {
    const sent = { ...headers, Accept: "text/event-stream" };
    if (lastId !== null) sent["Last-Event-ID"] = lastId;
    try {
      const response = await fetch(url, { headers: sent, signal: controller.signal, cache: "no-store" });
      if (response.status >= 400 && response.status < 500) {
        closed = true;
        onRefused(response.status);
        return;
      }
      if (response.ok && response.body) await read(response.body);
    } catch {
      // aborted by close(), or the connection broke: both handled below
    }
    if (closed) return;
    onBroken();
    if (reconnectMs === null) closed = true;
    else timer = setTimeout(connect, reconnectMs);
  }

  async function read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let name = "message";
    let data = [];
    while (!closed) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop(); // an unfinished line waits for the next chunk
      for (const line of lines) {
        if (line === "") {
          if (data.length) onEvent(name, data.join("\n"));
          name = "message";
          data = [];
          if (closed) return; // a handler closed the stream (the `end` event)
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
        else if (field === "id") lastId = value;
      }
    }
  }

  connect();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      controller.abort();
    },
  };
}
