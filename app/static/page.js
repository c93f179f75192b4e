// The page: a file is streamed through POST /transcribe (Server-Sent Events), its words play the audio from
// where they start, downloads are made here from the done event; the microphone speaks OpenAI's Realtime
// transcription protocol over /v1/realtime. Every URL is relative: the page also works under a path prefix.
"use strict";

(() => {
  // partials=true: the server's extension, captions of a turn while it is still spoken.
  const REALTIME_PATH = "v1/realtime?intent=transcription&partials=true";
  const CONNECT_TIMEOUT_MS = 10000;
  const FINISH_TIMEOUT_MS = 10000; // after Stop: how long to wait for the last turn's transcript
  const READY_RETRY_MS = 2000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"),
    dropzone: $("dropzone"),
    fileInput: $("file-input"),
    record: $("record"),
    recordLabel: document.querySelector("#record .record-label"),
    status: $("status"),
    transcript: $("transcript"),
    meta: $("meta"),
    language: $("meta-language"),
    duration: $("meta-duration"),
    processing: $("meta-processing"),
    metaModel: $("meta-model"),
    downloads: $("downloads"),
    playback: $("playback"),
    player: $("player"),
    words: $("words"),
  };

  let upload = null; // {controller} of the transcription being streamed
  let recording = null; // the live session (see startRecording)
  let audioUrl = null;
  const downloadUrls = [];

  // --- status and formatting ------------------------------------------------------------------------------

  function setStatus(text, state = "idle") {
    ui.status.textContent = text;
    ui.status.dataset.state = state;
  }

  function seconds(value) {
    if (value < 60) return `${value.toFixed(1)} s`;
    const minutes = Math.floor(value / 60);
    return `${minutes}:${String(Math.floor(value % 60)).padStart(2, "0")} min`;
  }

  function languageName(code) {
    try {
      const name = new Intl.DisplayNames([navigator.language || "en"], { type: "language" }).of(code);
      return name && name !== code ? `${name} (${code})` : code;
    } catch {
      return code;
    }
  }

  // `HH:MM:SS<sep>mmm`, as the server's srt and vtt (app/formats.py).
  function timestamp(value, separator) {
    let millis = Math.max(0, Math.round(value * 1000));
    const hours = Math.floor(millis / 3600000);
    millis -= hours * 3600000;
    const minutes = Math.floor(millis / 60000);
    millis -= minutes * 60000;
    const secs = Math.floor(millis / 1000);
    millis -= secs * 1000;
    const two = (n) => String(n).padStart(2, "0");
    return `${two(hours)}:${two(minutes)}:${two(secs)}${separator}${String(millis).padStart(3, "0")}`;
  }

  function segmentsOf(done) {
    if (done.segments && done.segments.length) return done.segments;
    return done.text ? [{ start: 0, end: done.duration, text: done.text }] : [];
  }

  const formats = {
    txt: (done) => ({ type: "text/plain", body: done.text + "\n" }),
    srt: (done) => ({
      type: "application/x-subrip",
      body: segmentsOf(done)
        .map((s, i) => `${i + 1}\n${timestamp(s.start, ",")} --> ${timestamp(s.end, ",")}\n${s.text.trim()}\n`)
        .join("\n"),
    }),
    vtt: (done) => ({
      type: "text/vtt",
      body:
        "WEBVTT\n\n" +
        segmentsOf(done)
          .map((s) => `${timestamp(s.start, ".")} --> ${timestamp(s.end, ".")}\n${s.text.trim()}\n`)
          .join("\n"),
    }),
    json: (done) => {
      const { type, ...body } = done; // the JSON answer of POST /transcribe, without the event's type
      return { type: "application/json", body: JSON.stringify(body, null, 2) + "\n" };
    },
  };

  // --- the view ---------------------------------------------------------------------------------------------

  function clearResult() {
    ui.transcript.textContent = "";
    ui.transcript.setAttribute("aria-busy", "false");
    ui.meta.hidden = true;
    ui.downloads.hidden = true;
    ui.playback.hidden = true;
    ui.words.textContent = "";
    for (const url of downloadUrls.splice(0)) URL.revokeObjectURL(url);
  }

  function showDone(done, name) {
    ui.transcript.textContent = done.text; // the final text: it may revise what streamed
    ui.transcript.setAttribute("aria-busy", "false");
    ui.language.textContent = done.language ? languageName(done.language) : "–";
    ui.duration.textContent = seconds(done.duration || 0);
    const total = done.timings ? done.timings.total_s : null;
    const speed = total > 0 ? ` (${(done.duration / total).toFixed(1)}× real time)` : "";
    ui.processing.textContent = total == null ? "–" : `${total.toFixed(2)} s${speed}`;
    ui.metaModel.textContent = done.model || "–";
    ui.meta.hidden = false;

    const base = name.replace(/\.[^.]*$/, "") || "transcript";
    for (const [format, make] of Object.entries(formats)) {
      const { type, body } = make(done);
      const url = URL.createObjectURL(new Blob([body], { type }));
      downloadUrls.push(url);
      const link = $(`download-${format}`);
      link.href = url;
      link.download = `${base}.${format}`;
      link.setAttribute("aria-label", `Download as ${format}`);
    }
    ui.downloads.hidden = !done.text;
    showWords(done.words || [], done.segments || []);
    setStatus(
      done.text
        ? `Done: ${seconds(done.duration || 0)} of audio` + (total == null ? "." : ` in ${total.toFixed(2)} s.`)
        : "Done: no speech found.",
      "done",
    );
  }

  // The words, a line per segment that starts with its time; each word a button that plays from its start.
  function showWords(words, segments) {
    ui.words.textContent = "";
    let line = null;
    let next = 0; // the next segment to open a line for
    words.forEach((w, index) => {
      if (line === null || (next < segments.length && w.start >= segments[next].start - 0.01)) {
        while (next + 1 < segments.length && w.start >= segments[next + 1].start - 0.01) next += 1;
        const start = next < segments.length ? Math.min(segments[next].start, w.start) : w.start;
        next += 1;
        line = document.createElement("p");
        line.className = "line";
        const time = document.createElement("span");
        time.className = "time";
        time.setAttribute("aria-hidden", "true"); // each word says its time to screen readers
        time.textContent = clock(start);
        line.append(time, " ");
        ui.words.append(line);
      }
      const button = document.createElement("button");
      button.type = "button";
      button.className = "word";
      button.textContent = w.word.trim();
      button.dataset.start = w.start;
      button.dataset.end = w.end;
      button.tabIndex = index === 0 ? 0 : -1;
      button.setAttribute("aria-label", `${w.word.trim()}, at ${w.start.toFixed(2)} seconds`);
      button.title = `${w.start.toFixed(2)}–${w.end.toFixed(2)} s`;
      line.append(button, " ");
    });
    ui.playback.hidden = words.length === 0;
  }

  // `M:SS.s`, the time at the start of a line of words.
  function clock(value) {
    const minutes = Math.floor(value / 60);
    return `${minutes}:${(value - minutes * 60).toFixed(1).padStart(4, "0")}`;
  }

  function playFrom(start) {
    const seek = () => {
      ui.player.currentTime = start;
      ui.player.play().catch((error) => {
        setStatus(`The browser cannot play this file: ${error.message}`, "error");
      });
    };
    if (ui.player.readyState >= HTMLMediaElement.HAVE_METADATA) seek();
    else ui.player.addEventListener("loadedmetadata", seek, { once: true });
  }

  ui.words.addEventListener("click", (event) => {
    const word = event.target.closest(".word");
    if (!word) return;
    moveFocus(word);
    playFrom(Number(word.dataset.start));
  });

  // One word in the tab order; arrow keys, Home and End move between words (a roving tabindex).
  ui.words.addEventListener("keydown", (event) => {
    const words = [...ui.words.querySelectorAll(".word")];
    const index = words.indexOf(document.activeElement);
    if (index < 0) return;
    const last = words.length - 1;
    const moves = {
      ArrowRight: index + 1, ArrowDown: index + 1, ArrowLeft: index - 1, ArrowUp: index - 1, Home: 0, End: last,
    };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const target = words[Math.max(0, Math.min(words.length - 1, moves[event.key]))];
    moveFocus(target);
    target.focus();
  });

  function moveFocus(word) {
    for (const w of ui.words.querySelectorAll('.word[tabindex="0"]')) w.tabIndex = -1;
    word.tabIndex = 0;
  }

  // The word being played is highlighted.
  ui.player.addEventListener("timeupdate", () => {
    const t = ui.player.currentTime;
    let current = null;
    for (const w of ui.words.querySelectorAll(".word")) {
      if (Number(w.dataset.start) <= t) current = w;
      else break;
    }
    for (const w of ui.words.querySelectorAll(".playing")) if (w !== current) w.classList.remove("playing");
    if (current && !ui.player.paused) current.classList.add("playing");
  });

  // --- upload: POST /transcribe, stream=true ----------------------------------------------------------------

  // The `data:` events of a Server-Sent Events body, parsed as JSON (comments, the keep-alives, are skipped).
  async function* serverSentEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const blocks = buffer.split(/\r?\n\r?\n/);
      buffer = blocks.pop();
      for (const block of blocks) {
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield JSON.parse(data);
      }
    }
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch {
      // not the service's error shape (a proxy's page): the status line says enough
    }
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  async function transcribeFile(file) {
    stopRecording();
    if (upload) upload.controller.abort();
    const current = (upload = { controller: new AbortController() });
    clearResult();
    if (audioUrl) URL.revokeObjectURL(audioUrl);
    audioUrl = URL.createObjectURL(file);
    ui.player.src = audioUrl;

    const form = new FormData();
    form.append("file", file, file.name);
    form.append("stream", "true");
    form.append("timestamps", "word");
    setStatus(`Uploading ${file.name}…`, "busy");
    try {
      const signal = current.controller.signal;
      const response = await fetch("transcribe", { method: "POST", body: form, signal });
      if (!response.ok) {
        setStatus(`Could not transcribe ${file.name}: ${await errorMessage(response)}`, "error");
        return;
      }
      setStatus(`Transcribing ${file.name}…`, "busy");
      ui.transcript.setAttribute("aria-busy", "true");
      for await (const event of serverSentEvents(response.body)) {
        if (event.type === "transcript.text.delta") {
          ui.transcript.append(event.delta);
        } else if (event.type === "transcript.text.done") {
          showDone(event, file.name);
          return;
        } else if (event.type === "error") {
          setStatus(`Transcription failed: ${event.error ? event.error.message : "unknown error"}`, "error");
          return;
        }
      }
      setStatus("The connection ended before the transcript was done.", "error");
    } catch (error) {
      if (error.name !== "AbortError") setStatus(`Could not reach the server: ${error.message}`, "error");
    } finally {
      ui.transcript.setAttribute("aria-busy", "false");
      if (upload === current) upload = null;
    }
  }

  ui.fileInput.addEventListener("change", () => {
    const file = ui.fileInput.files[0];
    if (file) transcribeFile(file);
    ui.fileInput.value = ""; // choosing the same file again starts again
  });

  // A file dropped anywhere on the page; the drop zone shows where.
  let dragDepth = 0;
  window.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dragDepth += 1;
    ui.dropzone.classList.add("dragging");
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) ui.dropzone.classList.remove("dragging");
  });
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    ui.dropzone.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) transcribeFile(file);
  });

  // --- microphone: OpenAI Realtime transcription over /v1/realtime ------------------------------------------

  function realtimeUrl() {
    const url = new URL(REALTIME_PATH, document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  function base64(buffer) {
    const bytes = new Uint8Array(buffer);
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    }
    return btoa(binary);
  }

  function sessionUpdate() {
    return {
      type: "session.update",
      session: {
        type: "transcription",
        audio: {
          input: {
            format: { type: "audio/pcm", rate: Pcm16.PCM_RATE },
            transcription: { model: "whisper-1" },
            turn_detection: {
              type: "server_vad",
              threshold: 0.5,
              prefix_padding_ms: 300,
              silence_duration_ms: 500,
            },
          },
        },
      },
    };
  }

  function setRecordButton(state) {
    ui.record.setAttribute("aria-pressed", String(state === "recording"));
    ui.record.classList.toggle("recording", state === "recording");
    ui.record.disabled = state === "connecting" || state === "finishing";
    const labels = { idle: "Record", connecting: "Connecting…", recording: "Stop", finishing: "Finishing…" };
    ui.recordLabel.textContent = labels[state];
  }

  // One caption per conversation item (a turn), in the order the turns began.
  function caption(session, itemId) {
    let element = session.captions.get(itemId);
    if (!element) {
      element = document.createElement("span");
      element.className = "caption";
      element.dataset.itemId = itemId;
      session.captions.set(itemId, element);
      ui.transcript.append(element, " ");
    }
    return element;
  }

  function onRealtimeEvent(session, event) {
    switch (event.type) {
      case "session.created":
      case "session.updated":
        if (session.state === "recording") setStatus("Listening: speak, the captions appear below.", "busy");
        break;
      case "input_audio_buffer.speech_started":
        if (event.item_id) caption(session, event.item_id);
        setStatus("Hearing speech…", "busy");
        break;
      case "input_audio_buffer.speech_stopped":
        setStatus("Transcribing the last words…", "busy");
        break;
      case "input_audio_buffer.committed":
        caption(session, event.item_id);
        session.pending.add(event.item_id);
        break;
      case "conversation.item.input_audio_transcription.partial": {
        // The text so far of a turn still being spoken; its deltas replace it once the turn ends.
        const element = caption(session, event.item_id);
        if (!element.classList.contains("final") && !element.dataset.streaming) {
          element.textContent = event.transcript.trim();
          element.dataset.partial = "true";
        }
        break;
      }
      case "conversation.item.input_audio_transcription.delta": {
        const element = caption(session, event.item_id);
        if (element.dataset.partial) {
          element.textContent = "";
          delete element.dataset.partial;
        }
        element.dataset.streaming = "true";
        element.textContent += event.delta;
        break;
      }
      case "conversation.item.input_audio_transcription.completed": {
        const element = caption(session, event.item_id);
        element.textContent = event.transcript.trim();
        element.classList.add("final");
        session.pending.delete(event.item_id);
        if (session.state === "recording") setStatus("Listening: speak, the captions appear below.", "busy");
        if (session.state === "finishing" && session.pending.size === 0) {
          closeSession(session, "Recording stopped.");
        }
        break;
      }
      case "error": {
        const error = event.error || {};
        if (session.state === "finishing") {
          // e.g. the final commit of an empty buffer: nothing was left to transcribe
          if (session.pending.size === 0) closeSession(session, "Recording stopped.");
          break;
        }
        setStatus(`Live captions: ${error.message || "the server reported an error"}`, "error");
        break;
      }
      default:
        break; // other events (the server's extensions) are not needed here
    }
  }

  async function startRecording() {
    if (upload) upload.controller.abort();
    clearResult();
    const session = { state: "connecting", captions: new Map(), pending: new Set(), opened: false };
    recording = session;
    setRecordButton("connecting");
    setStatus("Connecting to the realtime transcription service…", "busy");

    const socket = (session.socket = new WebSocket(realtimeUrl()));
    const timer = setTimeout(() => {
      if (!session.opened) socket.close();
    }, CONNECT_TIMEOUT_MS);
    socket.addEventListener("message", (message) => {
      if (typeof message.data !== "string") return;
      try {
        onRealtimeEvent(session, JSON.parse(message.data));
      } catch (error) {
        console.warn("realtime event not understood", error);
      }
    });
    socket.addEventListener("close", (event) => {
      clearTimeout(timer);
      if (session.state === "closed") return;
      if (!session.opened) {
        endSession(
          session,
          "Live captions are not available: the server did not accept a realtime connection at /v1/realtime.",
          "error",
        );
      } else if (session.state === "finishing") {
        endSession(session, "Recording stopped.", "done");
      } else {
        const reason = event.reason ? `: ${event.reason}` : ` (code ${event.code})`;
        endSession(session, `The realtime connection closed${reason}.`, "error");
      }
    });
    socket.addEventListener("open", async () => {
      clearTimeout(timer);
      session.opened = true;
      socket.send(JSON.stringify(sessionUpdate()));
      try {
        await startMicrophone(session);
      } catch (error) {
        const why = error.name === "NotAllowedError" ? "the microphone permission was denied" : error.message;
        endSession(session, `Could not use the microphone: ${why}.`, "error");
        return;
      }
      if (session.state !== "connecting") {
        releaseMicrophone(session); // stopped meanwhile
        return;
      }
      session.state = "recording";
      setRecordButton("recording");
      setStatus("Listening: speak, the captions appear below.", "busy");
    });
  }

  function sendAudio(session, buffer) {
    if (session.socket.readyState === WebSocket.OPEN && buffer.byteLength > 0) {
      session.socket.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(buffer) }));
    }
  }

  async function startMicrophone(session) {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this browser has no microphone access here (it needs https or localhost)");
    }
    session.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    const context = (session.context = new AudioContext());
    const source = context.createMediaStreamSource(session.stream);
    if (context.audioWorklet) {
      await context.audioWorklet.addModule("static/pcm.js");
      const node = new AudioWorkletNode(context, "pcm16", { numberOfOutputs: 1 });
      node.port.onmessage = (event) => {
        if (event.data instanceof ArrayBuffer) sendAudio(session, event.data);
        else if (event.data && event.data.flushed && session.flushed) session.flushed();
      };
      session.flush = () =>
        new Promise((resolve) => {
          session.flushed = resolve;
          node.port.postMessage("flush");
        });
      source.connect(node).connect(context.destination); // the node writes silence; connected, it is pulled
    } else {
      const resampler = new Pcm16.Pcm16Resampler(context.sampleRate);
      const node = context.createScriptProcessor(4096, 1, 1);
      node.onaudioprocess = (event) => {
        for (const chunk of resampler.push(event.inputBuffer.getChannelData(0))) sendAudio(session, chunk);
      };
      session.flush = async () => {
        const rest = resampler.flush();
        if (rest) sendAudio(session, rest);
      };
      source.connect(node).connect(context.destination);
    }
    await context.resume();
  }

  function releaseMicrophone(session) {
    if (session.stream) for (const track of session.stream.getTracks()) track.stop();
    if (session.context) session.context.close().catch(() => {});
    session.stream = session.context = null;
  }

  // Stop: the microphone ends at once; the audio not yet committed is committed and its transcript awaited.
  async function finishRecording(session) {
    session.state = "finishing";
    setRecordButton("finishing");
    setStatus("Finishing: transcribing the last words…", "busy");
    // (bounded: a suspended audio context would never answer)
    if (session.flush) await Promise.race([session.flush(), new Promise((done) => setTimeout(done, 1000))]);
    releaseMicrophone(session);
    if (session.socket.readyState !== WebSocket.OPEN) return;
    session.socket.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
    session.finishTimer = setTimeout(() => closeSession(session, "Recording stopped."), FINISH_TIMEOUT_MS);
  }

  function closeSession(session, message) {
    endSession(session, message, "done");
  }

  function endSession(session, message, state) {
    if (session.state === "closed") return;
    session.state = "closed";
    clearTimeout(session.finishTimer);
    releaseMicrophone(session);
    if (session.socket.readyState <= WebSocket.OPEN) session.socket.close(1000);
    if (recording === session) recording = null;
    setRecordButton("idle");
    setStatus(message, state);
  }

  function stopRecording() {
    if (recording) endSession(recording, "Recording stopped.", "done");
  }

  ui.record.addEventListener("click", () => {
    if (!recording) startRecording();
    else if (recording.state === "recording") finishRecording(recording);
  });

  // --- readiness --------------------------------------------------------------------------------------------

  async function checkReady() {
    try {
      const response = await fetch("readyz", { cache: "no-store" });
      if (response.ok) {
        const body = await response.json();
        ui.model.textContent = `Model: ${body.model}`;
        if (ui.status.dataset.state === undefined || ui.status.dataset.state === "waiting") {
          setStatus("Ready: choose a file, drop one here, or record.", "ready");
        }
        return;
      }
      if (ui.status.dataset.state === undefined || ui.status.dataset.state === "waiting") {
        setStatus(`The server is not ready yet: ${await errorMessage(response)}.`, "waiting");
      }
    } catch (error) {
      if (ui.status.dataset.state === undefined || ui.status.dataset.state === "waiting") {
        setStatus(`Cannot reach the server: ${error.message}.`, "waiting");
      }
    }
    setTimeout(checkReady, READY_RETRY_MS);
  }

  setRecordButton("idle");
  checkReady();
})();
